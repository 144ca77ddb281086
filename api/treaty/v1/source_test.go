package treatyv1_test

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// The embedded descriptors (with comments) describe the same API as the generated code: a
// treaty.proto changed without `make generate` would make reflection show a stale API.
func TestEmbeddedDescriptorsMatchGeneratedCode(t *testing.T) {
	files, err := treatyv1.FilesWithComments()
	if err != nil {
		t.Fatal(err)
	}
	fd, err := files.FindFileByPath("treaty/v1/treaty.proto")
	if err != nil {
		t.Fatal(err)
	}
	embedded := protodesc.ToFileDescriptorProto(fd)
	if embedded.GetSourceCodeInfo() == nil || len(embedded.GetSourceCodeInfo().GetLocation()) == 0 {
		t.Fatal("the embedded descriptors carry no comments")
	}
	embedded.SourceCodeInfo = nil
	generated := protodesc.ToFileDescriptorProto(treatyv1.File_treaty_v1_treaty_proto)
	generated.SourceCodeInfo = nil
	if !proto.Equal(embedded, generated) {
		t.Fatal("api/treaty/v1/treaty.binpb differs from the generated code: run make generate")
	}
}
