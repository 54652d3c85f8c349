"""Delivery: what leaves the queue. The dispatcher (claims, sends, reconciles unknown
outcomes), the provider rate window, the delivery-status poller and the storm digests."""
