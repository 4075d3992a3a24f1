"""SGLang as the rollout engine, one concern a file: engine.py (SGLangEngine, composing the rest), fleet.py (several
replicas as one engine), process.py (an owned server's process), client.py (HTTP to a server), generation.py
(/generate requests and replies), receivers.py (calls to every server of a push at once), tensor_channel.py,
distributed_channel.py with group.py (the weight-update group), disk_channel.py (the three weight channels),
delta.py (delta_sync), plugins/ (model classes the servers import)."""
