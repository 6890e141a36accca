"""`supervise demo --tasks`: a farm of node agents runs resumable pipelines through a node loss."""
