"""Clients for sequence-layers-serving: Python (gRPC and WebSocket), the
`sl-stream` command and a browser client (clients/web/)."""

from clients.client import AsyncGrpcClient as AsyncGrpcClient
from clients.client import AsyncWebSocketClient as AsyncWebSocketClient
from clients.client import Client as Client
from clients.client import Ended as Ended
from clients.client import Moved as Moved
from clients.client import Output as Output
from clients.client import Speech as Speech
from clients.client import Started as Started
from clients.client import StreamingError as StreamingError
from clients.client import aconnect as aconnect
from clients.client import connect as connect
from clients.resume import ResumeOptions as ResumeOptions
