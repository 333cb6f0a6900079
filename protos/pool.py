"""The descriptor pool all of Optic's generated protobuf modules register in.

Not protobuf's default pool: our KServe messages have the same full names as
those that tritonclient (and any other Triton client library) generates from
Triton's own files, and two files defining ``inference.ModelConfig`` cannot
share one pool. In a pool of our own, Optic's modules and theirs live in one
process. ``codegen`` points the generated modules here.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
