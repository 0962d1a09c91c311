"""What the tests and the benchmarks both start for real: a `bentoml serve` of the service
(servers), a Redis server, haproxy and a fleet of replicas (fleet), customer files from the
dataset (data), Open Inference Protocol bodies in the binary framing (v2). Nothing here is imported by the service or by training."""
