"""pydesk's in-guest agent: the engine that runs inside the VM (the "dockerd").

It is copied into the guest image at /usr/lib/pydesk/agent and runs under the guest's
Python; it must not import anything from the host-side packages."""
