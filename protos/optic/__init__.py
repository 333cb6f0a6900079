"""Generated from protos/ by optic.proto.codegen; do not edit."""
