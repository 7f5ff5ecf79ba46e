"""The Edge Releases pages and JSON API (a FastAPI app mounted by the api-server at /edge)."""
