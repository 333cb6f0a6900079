"""Generated from protos/ by server.codegen; do not edit."""
