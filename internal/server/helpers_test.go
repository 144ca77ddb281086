package server

import "google.golang.org/grpc/mem"

func bufferSlice(b []byte) mem.BufferSlice { return mem.BufferSlice{mem.SliceBuffer(b)} }
