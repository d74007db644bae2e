"""One replica's Kafka side: the loop, delivery, offsets, batching, backpressure and lag."""
