"""Edge cost: device catalog, model profile, projection, diff, forecast."""
