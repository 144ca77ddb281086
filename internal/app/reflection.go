package app

import (
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/reflection"
	v1reflectiongrpc "google.golang.org/grpc/reflection/grpc_reflection_v1"
	v1alphareflectiongrpc "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// registerReflection serves gRPC reflection (v1 and v1alpha) with the API's comments: the
// descriptors come from the embedded set built with source info, and everything else (health,
// reflection itself) from the linked-in registry.
func registerReflection(s *grpc.Server) error {
	files, err := treatyv1.FilesWithComments()
	if err != nil {
		return fmt.Errorf("reflection: %w", err)
	}
	opts := reflection.ServerOptions{Services: s, DescriptorResolver: firstOf{files, protoregistry.GlobalFiles}}
	v1reflectiongrpc.RegisterServerReflectionServer(s, reflection.NewServerV1(opts))
	v1alphareflectiongrpc.RegisterServerReflectionServer(s, reflection.NewServer(opts))
	return nil
}

// firstOf resolves descriptors from the first registry that has them.
type firstOf []*protoregistry.Files

func (f firstOf) FindFileByPath(path string) (protoreflect.FileDescriptor, error) {
	for _, r := range f {
		if fd, err := r.FindFileByPath(path); err == nil {
			return fd, nil
		}
	}
	return nil, protoregistry.NotFound
}

func (f firstOf) FindDescriptorByName(name protoreflect.FullName) (protoreflect.Descriptor, error) {
	for _, r := range f {
		if d, err := r.FindDescriptorByName(name); err == nil {
			return d, nil
		}
	}
	return nil, protoregistry.NotFound
}
