"""Generate propscope/v1/*_pb2*.py from the repository's protos/ with grpcio-tools."""

from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTOS_DIR = PACKAGE_DIR.parent
# google/rpc/status.proto, vendored so that a build needs only grpcio-tools (see buf.yaml).
VENDORED_PROTOS_DIR = PROTOS_DIR / "vendor"


def generate() -> None:
    from grpc_tools import protoc

    google_protos = resources.files("grpc_tools") / "_proto"
    # Only the contract: protos/released/ (breaking-check baselines) and protos/vendor/ are not
    # ours to generate.
    sources = sorted(
        str(p.relative_to(PROTOS_DIR)) for p in (PROTOS_DIR / "propscope").rglob("*.proto")
    )
    args = [
        "protoc",
        f"-I{PROTOS_DIR}",
        f"-I{VENDORED_PROTOS_DIR}",
        f"-I{google_protos}",
        f"--python_out={PACKAGE_DIR}",
        f"--pyi_out={PACKAGE_DIR}",
        f"--grpc_python_out={PACKAGE_DIR}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate()
