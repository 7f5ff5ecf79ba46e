"""The Flower App of federated training: the spec's network trained by SuperNodes on their own partitions."""
