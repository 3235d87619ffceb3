// The C++ protobuf parser as a differential-test oracle for the gateway (tests/test_gateway_differential.py).
//
// Triton's gRPC front end parses requests with C++ libprotobuf's generated code; this program runs
// the same generated code (protoc --cpp_out of grpc_service.proto) on each input it is given.
// stdin: records of [1 byte kind][4 bytes little-endian length][body]; kind 0 ModelInferRequest,
// 1 ModelConfigRequest, 2 ServerLiveRequest. stdout: one line per record, "fail" or
// "ok <hex of the model name>" (the name field of ModelConfigRequest; "ok -" for ServerLive).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include <google/protobuf/stubs/logging.h>

#include "grpc_service.pb.h"

static void hex(const std::string& s, std::string* out) {
  static const char digits[] = "0123456789abcdef";
  for (unsigned char c : s) {
    out->push_back(digits[c >> 4]);
    out->push_back(digits[c & 15]);
  }
}

int main() {
  google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 would otherwise log each failure
  std::ios::sync_with_stdio(false);
  char head[5];
  std::string body, line;
  while (std::cin.read(head, 5)) {
    uint32_t n;
    std::memcpy(&n, head + 1, 4);
    body.resize(n);
    if (n && !std::cin.read(&body[0], n)) return 2;
    line.clear();
    bool ok = false;
    std::string name;
    if (head[0] == 0) {
      inference::ModelInferRequest m;
      ok = m.ParseFromString(body);
      name = m.model_name();
    } else if (head[0] == 1) {
      inference::ModelConfigRequest m;
      ok = m.ParseFromString(body);
      name = m.name();
    } else {
      inference::ServerLiveRequest m;
      ok = m.ParseFromString(body);
    }
    if (!ok) {
      line = "fail";
    } else {
      line = "ok ";
      if (head[0] == 2) line += "-"; else hex(name, &line);
      if (name.empty() && head[0] != 2) line += "-";
    }
    std::cout << line << '\n';
  }
  std::cout.flush();
  return 0;
}
