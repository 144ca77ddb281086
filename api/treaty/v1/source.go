package treatyv1

import (
	_ "embed"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// sourceDescriptors is treaty.proto with its imports as a FileDescriptorSet built by buf with
// source info (`make generate` writes it): the comments that protoc-gen-go leaves out of the
// descriptor it embeds in treaty.pb.go, so that reflection clients (grpcurl describe) show
// them.
//
//go:embed treaty.binpb
var sourceDescriptors []byte

// FilesWithComments returns the API's file descriptors with their source info (comments), for
// a reflection service.
func FilesWithComments() (*protoregistry.Files, error) {
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(sourceDescriptors, &set); err != nil {
		return nil, fmt.Errorf("treatyv1: embedded descriptor set: %w", err)
	}
	files, err := protodesc.NewFiles(&set)
	if err != nil {
		return nil, fmt.Errorf("treatyv1: embedded descriptor set: %w", err)
	}
	return files, nil
}
