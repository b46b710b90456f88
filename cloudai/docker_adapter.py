"""The one place CloudAI leans on docker-py beyond its documented API; tests/integration/test_docker_adapter.py
pins what is relied on here.

docker-py documents ``APIClient.attach_socket`` (the attach request's socket, to read a container's output as it
is written) but gives no way to release it: the socket's ``close()`` leaves the connection's file descriptor
open, because docker-py keeps the HTTP response on the socket (``_response``, so that a TLS socket stays open as
long as it is used) and the two form a reference cycle that only a full garbage collection frees
(docker/docker-py#3282). A worker attaches once a task, and a process with many objects collects them all
rarely: the descriptors piled up by the hundred. :meth:`AttachStream.close` closes that response.
"""

from __future__ import annotations

from typing import Any

import docker
import docker.utils.socket

#: stdout and stderr, as written from now on (opened before the start: that is all of it)
ATTACH_PARAMS = {"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}


class AttachStream:
    """A container's attach stream: Docker's multiplexed frames, read in pieces of any size, never timed out."""

    def __init__(self, api: docker.APIClient, container_id: str) -> None:
        self.sock: Any = api.attach_socket(container_id, params=dict(ATTACH_PARAMS))

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes once some arrived, however long the container is quiet; ``b""`` at the end."""
        while True:
            # docker-py's own attach reads so: it waits in poll() (no timeout), then takes what is there
            data = docker.utils.socket.read(self.sock, size)
            if data is not None:  # None: an interrupted read, to try again
                return bytes(data)

    def close(self) -> None:
        """Release the connection now (see the module's docstring)."""
        response = getattr(self.sock, "_response", None)
        if response is not None:
            response.close()  # first: it flushes the reader that wraps the socket
        self.sock.close()
