"""The director agent: from the Kubernetes API to this node's kernel (`kubelvs director`)."""
