package server

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/treatyhq/treaty/internal/engine"
)

// ValidateRequest runs the checks every request shares, whatever its RPC, before a handler sees
// it: every string (at any depth, repeated or not) passes engine.CheckString, and every
// google.protobuf.Duration engine.CheckDuration. Field names are paths such as
// "saga.steps[2].action.target". Handlers and the engine add the checks of each field's meaning.
func ValidateRequest(m proto.Message) error {
	r := m.ProtoReflect()
	if isBadUTF8Marker(r) {
		return &engine.InvalidArgumentError{Field: "request", Reason: "a string field is not valid UTF-8"}
	}
	return validateMessage(nil, r)
}

var durationName = (&durationpb.Duration{}).ProtoReflect().Descriptor().FullName()

// fieldPath names a field for an error message. It is formatted only when a check fails: a
// valid request, which is nearly every request, builds no strings (formatting every field's
// path was half of this check's cost, issue 13).
type fieldPath struct {
	parent *fieldPath
	name   string
	index  int     // list element, or -1
	key    *string // map entry, or nil
}

func (p *fieldPath) String() string {
	if p == nil {
		return ""
	}
	s := p.name
	if p.parent != nil {
		s = p.parent.String() + "." + s
	}
	switch {
	case p.index >= 0:
		s = fmt.Sprintf("%s[%d]", s, p.index)
	case p.key != nil:
		s = fmt.Sprintf("%s[%q]", s, *p.key)
	}
	return s
}

func validateMessage(at *fieldPath, r protoreflect.Message) error {
	if r.Descriptor().FullName() == durationName {
		d, ok := r.Interface().(*durationpb.Duration)
		if !ok {
			d = &durationpb.Duration{Seconds: r.Get(r.Descriptor().Fields().ByNumber(1)).Int(), Nanos: int32(r.Get(r.Descriptor().Fields().ByNumber(2)).Int())}
		}
		if d.CheckValid() == nil {
			return nil
		}
		return engine.CheckDuration(at.String(), d)
	}
	var err error
	r.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		here := fieldPath{parent: at, name: string(fd.Name()), index: -1}
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				el := here
				el.index = i
				err = validateValue(&el, fd, l.Get(i))
			}
		case fd.IsMap():
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				ks := k.String()
				if fd.MapKey().Kind() == protoreflect.StringKind && engine.CheckString("", ks, 0) != nil {
					err = engine.CheckString(here.String()+" key", ks, 0)
				}
				if err == nil {
					el := here
					el.key = &ks
					err = validateValue(&el, fd.MapValue(), mv)
				}
				return err == nil
			})
		default:
			err = validateValue(&here, fd, v)
		}
		return err == nil
	})
	return err
}

func validateValue(at *fieldPath, fd protoreflect.FieldDescriptor, v protoreflect.Value) error {
	switch fd.Kind() {
	case protoreflect.StringKind:
		if engine.CheckString("", v.String(), 0) != nil {
			return engine.CheckString(at.String(), v.String(), 0)
		}
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return validateMessage(at, v.Message())
	}
	return nil
}

// ValidateUnary is the unary interceptor that applies ValidateRequest to every request of the
// coordinator's API; refusals are INVALID_ARGUMENT naming the field.
func ValidateUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if m, ok := req.(proto.Message); ok && strings.HasPrefix(info.FullMethod, "/treaty.") {
		if err := ValidateRequest(m); err != nil {
			return nil, toStatus(err)
		}
	}
	return handler(ctx, req)
}

// badUTF8Field is the unknown field by which Codec marks a request whose strings are not valid
// UTF-8: gRPC would answer a decoding error INTERNAL, and it is the client's mistake.
const badUTF8Field = protoreflect.FieldNumber(536870911)

var badUTF8Marker = protowireTag(badUTF8Field)

// protowireTag is a varint field (number n, value 0) in wire format.
func protowireTag(n protoreflect.FieldNumber) []byte {
	tag := uint64(n) << 3
	var b []byte
	for tag >= 0x80 {
		b = append(b, byte(tag)|0x80)
		tag >>= 7
	}
	return append(b, byte(tag), 0)
}

func isBadUTF8Marker(r protoreflect.Message) bool {
	return string(r.GetUnknown()) == string(badUTF8Marker)
}

// Codec is gRPC's proto codec, except that a request rejected by the decoder for invalid UTF-8
// reaches ValidateUnary (as an empty message with a marker) and is refused INVALID_ARGUMENT
// there rather than INTERNAL by gRPC. Install it with grpc.ForceServerCodecV2.
type Codec struct{ encoding.CodecV2 }

// NewCodec wraps gRPC's registered proto codec.
func NewCodec() Codec { return Codec{encoding.GetCodecV2("proto")} }

// Unmarshal implements encoding.CodecV2.
func (c Codec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.CodecV2.Unmarshal(data, v)
	if err == nil || !strings.Contains(err.Error(), "invalid UTF-8") {
		return err
	}
	m, ok := v.(proto.Message)
	if !ok || !strings.HasPrefix(string(m.ProtoReflect().Descriptor().FullName()), "treaty.") {
		return err
	}
	proto.Reset(m)
	m.ProtoReflect().SetUnknown(badUTF8Marker)
	return nil
}
