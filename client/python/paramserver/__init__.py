"""Python client of the paramserver parameter server.

    import paramserver as ps
    client = ps.Client(["127.0.0.1:50051", "127.0.0.1:50052"])
    spec = ps.model_spec("m", {"w": np.zeros((4, 3), np.float32)}, [ps.group("all", ["*"], ps.adamw(1e-3))])
    model = client.register(spec, {"w": w0})
    joined = model.join("worker-0")
    model.start_heartbeat("worker-0", joined.lease_s)
    version, weights = model.pull(joined.version)
    model.push("worker-0", version, {"w": grad})

`paramserver.torch` attaches a torch module so its backward pass streams its
gradients (and its buffers go to the shards); `paramserver.safetensors` reads and
writes the files `Model.export` and `ctl export` produce; `paramserver.pb` holds
the generated protobuf messages.
"""

from .client import Client, Joined, LayoutChanged, Model, PushSummary, RolledBack, ServerError, Tls
from .codec import BF16, F16, F32, SIGN1
from .spec import adamw, arrays_of, buffer_names, buffers, group, model_spec, sgd, tensor
from .v1 import paramserver_pb2 as pb

__all__ = [
    "Client", "Joined", "LayoutChanged", "Model", "PushSummary", "RolledBack", "ServerError", "Tls",
    "F32", "BF16", "F16", "SIGN1",
    "adamw", "arrays_of", "buffer_names", "buffers", "group", "model_spec", "sgd", "tensor", "pb",
]
__version__ = "0.1.0"
