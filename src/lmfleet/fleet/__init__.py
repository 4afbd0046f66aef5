"""The fleet: its file (one typed model the gateway, the autoscaler, the providers
and deploy read), and ``lmfleet up``, which runs it on this machine."""
