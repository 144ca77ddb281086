package participant

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// gRPC metadata keys the coordinator sends on every participant call. They must stay identical
// to the coordinator's (internal/invoke); a test pins them to these literal strings.
const (
	MetadataGID    = "x-treaty-gid"
	MetadataBranch = "x-treaty-branch"
	MetadataOp     = "x-treaty-op"
	MetadataMode   = "x-treaty-mode"
)

// Modes the coordinator sends in MetadataMode.
const (
	ModeSaga = "saga"
	ModeTCC  = "tcc"
	Mode2PC  = "2pc"
	ModeMsg  = "msg"
)

// Operations the coordinator sends in MetadataOp.
const (
	OpAction     = "action"     // saga forward step
	OpCompensate = "compensate" // saga undo of OpAction
	OpTry        = "try"        // TCC reservation
	OpConfirm    = "confirm"    // TCC: make the reservation final
	OpCancel     = "cancel"     // TCC undo of OpTry
	OpPrepare    = "prepare"    // 2PC phase one
	OpCommit     = "commit"     // 2PC phase two, commit
	OpRollback   = "rollback"   // 2PC phase two, undo of OpPrepare
)

// Limits on the metadata values, the same the coordinator enforces when a transaction is
// submitted. The 2PC prepared-transaction id depends on them (see PreparedID).
const (
	MaxGIDLen    = 128
	MaxBranchLen = 64
	MaxOpLen     = 32 // also the limit on Mode
)

// Metadata identifies one participant call: which global transaction (GID), which of its
// branches, which operation and in which coordination mode.
type Metadata struct {
	GID, Branch, Op, Mode string
}

// String renders m for logs and error messages.
func (m Metadata) String() string {
	return fmt.Sprintf("%s %s of gid %q branch %q", m.Mode, m.Op, m.GID, m.Branch)
}

// Validate reports the first field that is empty, too long or holds a character outside
// [A-Za-z0-9._:-]. The error wraps ErrInvalidMetadata.
func (m Metadata) Validate() error {
	for _, f := range []struct {
		name, key, value string
		limit            int
	}{
		{"gid", MetadataGID, m.GID, MaxGIDLen},
		{"branch", MetadataBranch, m.Branch, MaxBranchLen},
		{"op", MetadataOp, m.Op, MaxOpLen},
		{"mode", MetadataMode, m.Mode, MaxOpLen},
	} {
		if err := validateField(f.name, f.key, f.value, f.limit); err != nil {
			return err
		}
	}
	return nil
}

func validateField(name, key, value string, limit int) error {
	if value == "" {
		return fmt.Errorf("%w: %s is empty (gRPC metadata %s missing: is the call from a Treaty "+
			"coordinator, and is participant.UnaryServerInterceptor installed?)", ErrInvalidMetadata, name, key)
	}
	if len(value) > limit {
		return fmt.Errorf("%w: %s is %d bytes, limit %d", ErrInvalidMetadata, name, len(value), limit)
	}
	for i := 0; i < len(value); i++ {
		if !validChar(value[i]) {
			return fmt.Errorf("%w: %s %q has %q at byte %d, allowed are [A-Za-z0-9._:-]",
				ErrInvalidMetadata, name, value, value[i], i)
		}
	}
	return nil
}

// validChar is the coordinator's alphabet for gids and branch names. It excludes '/', which
// PreparedID relies on as its separator.
func validChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '.' || c == '_' || c == ':' || c == '-'
}

type contextKey struct{}

// NewContext returns a copy of ctx carrying md, as the interceptors do. Useful in tests of a
// handler and for transports other than gRPC.
func NewContext(ctx context.Context, md Metadata) context.Context {
	return context.WithValue(ctx, contextKey{}, md)
}

// FromContext returns the Treaty metadata of the call ctx belongs to. ok is false when the
// call carried none (it was not made by a Treaty coordinator) or no interceptor stored it.
func FromContext(ctx context.Context) (md Metadata, ok bool) {
	md, ok = ctx.Value(contextKey{}).(Metadata)
	return md, ok
}

// UnaryServerInterceptor reads the coordinator's metadata once per call and stores it in the
// handler's context, where FromContext finds it. A call without any Treaty metadata key reaches
// the handler untouched. A call with Treaty metadata that is incomplete or malformed is refused
// with INVALID_ARGUMENT naming the field, without calling the handler: running it without a
// usable gid or branch would defeat the barrier.
func UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		ctx, err := withIncoming(ctx)
		if err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
}

// StreamServerInterceptor is UnaryServerInterceptor for streaming methods: the stream's
// Context() carries the metadata.
func StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx, err := withIncoming(ss.Context())
		if err != nil {
			return err
		}
		if ctx == ss.Context() {
			return handler(srv, ss)
		}
		return handler(srv, &contextStream{ServerStream: ss, ctx: ctx})
	}
}

type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *contextStream) Context() context.Context { return s.ctx }

func withIncoming(ctx context.Context) (context.Context, error) {
	in, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return ctx, nil
	}
	first := func(key string) string {
		if v := in.Get(key); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	md := Metadata{
		GID:    first(MetadataGID),
		Branch: first(MetadataBranch),
		Op:     first(MetadataOp),
		Mode:   first(MetadataMode),
	}
	if md == (Metadata{}) {
		return ctx, nil
	}
	if err := md.Validate(); err != nil {
		return ctx, status.Error(codes.InvalidArgument, err.Error())
	}
	return NewContext(ctx, md), nil
}
