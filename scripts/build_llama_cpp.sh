#!/usr/bin/env bash
# Fetch llama.cpp as vendored by llama-cpp-python's source distribution (PyPI) and build only
# what bench/llama_cpp_lora.py needs: the shared libraries libllama + libggml (CPU backend).
# The sdist also carries the matching Python bindings (llama_cpp/, ctypes only) and
# convert_lora_to_gguf.py / convert_hf_to_gguf.py with their gguf-py, which the benchmark uses
# from the same place. What those need beyond .venv (diskcache for the bindings, sentencepiece
# for convert_hf_to_gguf.py's LLaMA vocabulary probe) goes into the cache too (pydeps/).
#
#   bash scripts/build_llama_cpp.sh [CACHE_DIR]
#
# Target: $1, else $ALORA_DS_CACHE/llama-cpp-python-VERSION, else
# ~/.cache/alora-ds/llama-cpp-python-VERSION. Nothing is written inside the repository.
# About 10 minutes on 2 cores. Idempotent: a second run only checks a stamp file. Prints the
# directory on its last line.
set -euo pipefail

version=0.3.36
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo_root/.venv/bin/python}"
cache_root="${ALORA_DS_CACHE:-$HOME/.cache/alora-ds}"
dest="${1:-$cache_root/llama-cpp-python-$version}"
src="$dest/llama_cpp_python-$version"
build="$dest/build"
stamp="$dest/.built"

if [[ -f "$stamp" ]]; then
    echo "llama.cpp (llama-cpp-python $version) already built in $dest" >&2
    echo "$dest"
    exit 0
fi

mkdir -p "$dest"
if [[ ! -d "$src" ]]; then
    "$python" -m pip download --no-deps --no-binary :all: --dest "$dest" \
        "llama-cpp-python==$version" >&2
    tar -xzf "$dest/llama_cpp_python-$version.tar.gz" -C "$dest"
fi

# Only the libraries: no tests, tools, examples, server or common utils (and so no curl or
# OpenSSL). GGML_NATIVE: this cache is for this machine, so use its vector units.
cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build "$build" --target llama -j "$(nproc)" >&2
test -f "$build/bin/libllama.so"
"$python" -m pip install --no-deps --target "$dest/pydeps" diskcache==5.6.3 sentencepiece==0.2.1 >&2
touch "$stamp"
echo "$dest"
