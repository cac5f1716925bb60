"""Build hook: generate protoq/protoq_pb2.py from protocol/protoq.proto with
protoc (Debian: protobuf-compiler) into the build tree. The generated file
is never committed, exactly like the C side's protoc-c output.

The .proto is looked up at $PROTOQ_PROTO, then next to this file (an sdist
carries a copy), then at ../../protocol/protoq.proto (the source tree).
"""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))


def find_proto():
    for p in (os.environ.get("PROTOQ_PROTO"),
              os.path.join(HERE, "protoq.proto"),
              os.path.join(HERE, "..", "..", "protocol", "protoq.proto")):
        if p and os.path.isfile(p):
            return os.path.abspath(p)
    raise SystemExit("protoq: protoq.proto not found (set PROTOQ_PROTO)")


def protoc(out_dir):
    proto = find_proto()
    exe = os.environ.get("PROTOC") or shutil.which("protoc")
    if exe is None:
        raise SystemExit("protoq: protoc not found (Debian: apt-get install "
                         "protobuf-compiler)")
    os.makedirs(out_dir, exist_ok=True)
    subprocess.check_call([exe, "--proto_path", os.path.dirname(proto),
                           "--python_out", out_dir, proto])


class BuildPy(build_py):
    def run(self):
        super().run()
        protoc(os.path.join(self.build_lib, "protoq"))


class Sdist(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        shutil.copy(find_proto(), os.path.join(base_dir, "protoq.proto"))


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
