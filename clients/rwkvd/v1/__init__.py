"""Generated protobuf and gRPC stubs of rwkvd.v1 (built from proto/ by build_stubs.py; do not edit them)."""
