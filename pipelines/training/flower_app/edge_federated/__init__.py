"""The Flower App of federated training: EdgeNet trained by SuperNodes on their own partitions."""
