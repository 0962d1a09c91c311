"""The Open Inference Protocol (KServe V2) for the churn model, over REST and gRPC.

codec.py     tensors (JSON, binary, gRPC raw or typed) to checked columns, and answers back
rest.py      the REST API under /v2 (a hot route), with the binary tensor data extension
grpc.py      inference.GRPCInferenceService and grpc.health.v1 on BANKCHURN_GRPC_PORT
openapi.py   the /v2 operations in /docs.json
grpc_predict_v2.proto and its generated modules (make protos)
"""
