"""The front doors: gRPC and WebSocket (+ HTTP) over one stream bridge and one auth check."""

from server.frontdoors.auth import ApiKeys as ApiKeys
from server.frontdoors.bridge import END as END
from server.frontdoors.bridge import StreamBridge as StreamBridge
from server.frontdoors.bridge import StreamHandle as StreamHandle
from server.frontdoors.bridge import StreamRuntime as StreamRuntime
from server.frontdoors.grpc import GrpcServer as GrpcServer
from server.frontdoors.http import create_app as create_app
