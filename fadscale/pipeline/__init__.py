"""What composes several stages: the pipeline plan (shard -> experts -> cache -> train -> sample -> evaluate),
the demo, and its report."""
