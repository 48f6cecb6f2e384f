"""The edge: gRPC and HTTP servers, the clients, the CLI, the Ray Serve deployments."""
import os

# gRPC's fork handlers (on in grpcio's wheels) run at every fork() of a process that has used gRPC. With the server's
# threads inside gRPC they are skipped or run half-way, and a child forked then can hang before it execs (grpc/grpc
# #37259): Ray's local cluster starts gcs_server and raylet by fork + exec, and `ray.init` then timed out waiting for
# a GCS that never ran. This process forks only to exec, where the handlers have nothing to do, so they are turned
# off. gRPC reads the variable when it is first imported: this package sets it before any of its modules imports grpc
# or ray (the tests' conftest and the benchmarks import it first for the same reason). Set it yourself to override.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
