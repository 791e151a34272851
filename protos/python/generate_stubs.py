"""Generate propscope/v1/*_pb2*.py from the contract's .proto files with grpcio-tools."""

from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The contract: the repository's protos/ (this folder's parent), or, in an sdist, the copy that
# setup.py's sdist command puts in protos/ beside this file.
BUNDLED_CONTRACT_DIR = PACKAGE_DIR / "protos"
# The contract's own files, and google/rpc/status.proto, vendored so that a build needs only
# grpcio-tools (see buf.yaml). protos/released/ (breaking-check baselines) is not ours to generate.
CONTRACT_PARTS = ("propscope", "vendor")


def contract_dir() -> Path:
    """Where the .proto files are: the sdist's bundled copy when there is one."""
    return BUNDLED_CONTRACT_DIR if BUNDLED_CONTRACT_DIR.is_dir() else PACKAGE_DIR.parent


def generate() -> None:
    from grpc_tools import protoc

    protos = contract_dir()
    google_protos = resources.files("grpc_tools") / "_proto"
    sources = sorted(str(p.relative_to(protos)) for p in (protos / "propscope").rglob("*.proto"))
    args = [
        "protoc",
        f"-I{protos}",
        f"-I{protos / 'vendor'}",
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
