"""The durable spool: where accepted mail waits for delivery."""
