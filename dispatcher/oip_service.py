"""Open Inference Protocol servicer (in progress)."""
from __future__ import annotations

from .app import App
from .gen.inference import grpc_service_pb2_grpc


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: App):
        self.app = app
