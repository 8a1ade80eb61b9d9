"""The HTTP service: ``/ask``, ``/search`` and the governed routing core."""
