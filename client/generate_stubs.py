"""Generate propscope/v1/*_pb2*.py from the repository's protos/ with grpcio-tools."""

from importlib import resources
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parent
PROTOS_DIR = CLIENT_DIR.parent / "protos"


def generate() -> None:
    from grpc_tools import protoc

    google_protos = resources.files("grpc_tools") / "_proto"
    sources = sorted(str(p.relative_to(PROTOS_DIR)) for p in PROTOS_DIR.rglob("*.proto"))
    includes = [f"-I{PROTOS_DIR}", f"-I{google_protos}"]
    common_protos = _googleapis_protos_dir()
    if common_protos:
        includes.append(f"-I{common_protos}")
    args = [
        "protoc",
        *includes,
        f"--python_out={CLIENT_DIR}",
        f"--pyi_out={CLIENT_DIR}",
        f"--grpc_python_out={CLIENT_DIR}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def _googleapis_protos_dir() -> str | None:
    """googleapis-common-protos ships google/rpc/status.proto next to its modules."""
    try:
        import google.rpc

        return str(Path(google.rpc.__path__[0]).parent.parent)
    except ImportError:
        return None


if __name__ == "__main__":
    generate()
