"""The localkube node agent: a small virtual kubelet that runs pods bound to its nodes as host processes."""
