#!/bin/bash
# Build llama.cpp's draft-model speculation examples (llama-speculative, llama-speculative-simple)
# from the llama.cpp sources vendored in llama-cpp-python's sdist, for bench_speculative.py's
# "llama.cpp draft" methods (#17).
#
#   flock /tmp/qwen2-bench.lock bash benchmarks/build_llama_speculative.sh [WORK_DIR]
#   -> WORK_DIR/llama-speculative, WORK_DIR/llama-speculative-simple (default /tmp/llama-spec)
#
# Only common/, cpp-httplib and the two examples are compiled (54 files, ~3-5 min at -j2 on 2
# cores); they link against the installed llama-cpp-python's own libllama / libggml*.so (the same
# version, same build), so the binaries run exactly the kernels that the Python legs run. Files off
# the decode path (argument parsing, chat templates, HTTP download) are compiled -O1, the rest
# (common.cpp, sampling.cpp, speculative.cpp, log.cpp, the examples) with the Release -O3 flags.
set -euo pipefail
W=${1:-/tmp/llama-spec}
mkdir -p "$W/obj"
W=$(cd "$W" && pwd)
PY=${PYTHON:-python}
VER=$($PY -c "import llama_cpp; print(llama_cpp.__version__)")
LIB=$($PY -c "import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))")
SRC="$W/llama_cpp_python-$VER/vendor/llama.cpp"
if [ ! -d "$SRC" ]; then
  [ -f "$W/llama_cpp_python-$VER.tar.gz" ] || $PY -m pip download "llama-cpp-python==$VER" --no-binary :all: --no-deps -d "$W"
  tar xzf "$W/llama_cpp_python-$VER.tar.gz" -C "$W"
fi
B="$W/build"
if [ ! -f "$B/compile_commands.json" ]; then
  nice cmake -S "$SRC" -B "$B" -DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF > "$W/cmake.log"
fi
# a Makefile of the compile commands cmake wrote, for the files needed
$PY - "$B" "$W/obj" > "$W/Makefile" <<'EOF'
import json, shlex, sys
from pathlib import Path
build, out = Path(sys.argv[1]), Path(sys.argv[2])
hot = ("common/sampling.cpp", "common/speculative.cpp", "common/common.cpp", "common/log.cpp",
       "speculative.cpp", "speculative-simple.cpp")
groups = {"COMMON": ("/common/", "/vendor/cpp-httplib/"), "SPEC": ("/examples/speculative/",),
          "SIMPLE": ("/examples/speculative-simple/",)}
objs, rules = {g: [] for g in groups}, []
for e in json.loads((build / "compile_commands.json").read_text()):
    f = e["file"]
    g = next((g for g, keys in groups.items() if any(k in f for k in keys)), None)
    if g is None:
        continue
    args = shlex.split(e["command"]) if "command" in e else list(e["arguments"])
    obj = str(out / (Path(f).parent.name + "_" + Path(f).name + ".o"))
    args[args.index("-o") + 1] = obj
    if not f.endswith(hot):
        args = ["-O1" if a in ("-O3", "-O2") else a for a in args]
    objs[g].append(obj)
    rules.append(f"{obj}:\n\tcd {e['directory']} && {shlex.join(args)}\n")
for g, o in objs.items():
    print(f"{g} = {' '.join(o)}")
print("all: $(COMMON) $(SPEC) $(SIMPLE)\n")
print("\n".join(rules))
EOF
nice make -f "$W/Makefile" -j2 all > "$W/make.log" 2>&1 || { tail -30 "$W/make.log"; exit 1; }
objs() { make -f "$W/Makefile" -s --no-print-directory --eval "print-%: ; @echo \$(\$*)" "print-$1"; }
for b in SPEC:llama-speculative SIMPLE:llama-speculative-simple; do
  nice g++ -o "$W/${b#*:}" $(objs "${b%%:*}") $(objs COMMON) -L"$LIB" -lllama -lggml -lggml-base -lggml-cpu \
    -lpthread -ldl -Wl,-rpath,"$LIB"
  echo "$W/${b#*:}"
done
