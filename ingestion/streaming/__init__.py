"""Streaming sources: change events from Redis Streams or NATS JetStream."""
