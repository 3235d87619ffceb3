#!/bin/sh
# The gateway's differential test builds C++ libprotobuf's parser (tests/protobuf_oracle.py): it needs
# protoc, the libprotobuf headers and g++. Installed with apt-get when missing and we are root,
# otherwise stop saying what to install.
set -eu
have() { command -v protoc >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 && [ -e /usr/include/google/protobuf/message.h ]; }
if ! have; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "protobuf oracle: installing protobuf-compiler libprotobuf-dev g++ (apt-get)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler libprotobuf-dev g++ >/dev/null
    else
        echo "protobuf oracle: protoc, libprotobuf headers and g++ are required (Debian/Ubuntu: sudo apt-get install protobuf-compiler libprotobuf-dev g++)." >&2
        exit 1
    fi
fi
echo "protobuf oracle: $(protoc --version) (C++ parser for the gateway's differential test)"
