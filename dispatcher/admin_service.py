"""Admin API servicer (in progress)."""
from __future__ import annotations

from .app import App
from .gen.vbert.v1 import admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, app: App):
        self.app = app
