"""Past one machine: sharded galleries (shardset.py), exact scatter-gather search over them
(scatter.py), and the Ray parts: actors per shard (ray_shards.py), distributed indexing as a Ray
Data job (ray_ingest.py), replicated serving as a Ray Serve deployment (ray_serve.py).

shardset.py and scatter.py need numpy, safetensors and faiss only; Ray is imported by the ray_*
modules alone (the optional extra `cvr-sdgm[cluster]`).
"""
