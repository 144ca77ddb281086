// Package rawcodec is a gRPC codec that passes already-serialized protobuf bytes through, so a
// process can call (or serve) any gRPC method without that method's generated code. The
// coordinator calls participants through it. To write a participant without .proto files, use
// sdk/participant's Service, which serves typed Go functions over protobuf messages.
package rawcodec

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
)

// Codec is a gRPC codec that passes bytes through untouched: Marshal takes a []byte (or
// *[]byte) that already holds a serialized protobuf, and Unmarshal fills a *[]byte with the wire
// bytes. Its Name is "proto", so the wire content-type is application/grpc+proto and any ordinary
// server decodes the request with its generated code.
//
// Use it per call (grpc.ForceCodecV2) or per server (grpc.ForceServerCodecV2), never with
// encoding.RegisterCodecV2: registering it would replace the process's real proto codec.
type Codec struct{}

var _ encoding.CodecV2 = Codec{}

// Name returns "proto", the content-subtype of the messages this codec carries.
func (Codec) Name() string { return "proto" }

// Marshal returns b as is; gRPC only reads it, so no copy is made.
func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	switch b := v.(type) {
	case []byte:
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	case *[]byte:
		if b == nil {
			return nil, fmt.Errorf("rawcodec: cannot marshal a nil *[]byte")
		}
		return mem.BufferSlice{mem.SliceBuffer(*b)}, nil
	default:
		return nil, fmt.Errorf("rawcodec: cannot marshal %T, want []byte", v)
	}
}

// Unmarshal copies the wire bytes into *v, since gRPC frees data as soon as this returns.
func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	b, ok := v.(*[]byte)
	if !ok || b == nil {
		return fmt.Errorf("rawcodec: cannot unmarshal into %T, want a non-nil *[]byte", v)
	}
	*b = data.Materialize()
	return nil
}
