package participant

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Service is a gRPC service made of typed Go functions, for participants that have no .proto
// file of their own: each method takes and returns a protobuf message, a generated one or a
// well-known type (structpb.Struct, wrapperspb.StringValue, emptypb.Empty, ...).
//
//	svc := participant.NewService("shop.Payments", nil)
//	participant.Handle(svc, "Charge", func(ctx context.Context, in *structpb.Struct) (*emptypb.Empty, error) {
//		...
//		return &emptypb.Empty{}, nil
//	})
//	svc.Register(grpcServer)
//
// Each method reads the coordinator's metadata itself (as UnaryServerInterceptor does), so
// FromContext works in a handler without configuring the server; the server's own interceptors
// run around the handler as they do for generated services. A handler's error passes through
// ToStatus: return an error wrapping ErrAborted for a business "no". The coordinator (and
// sdk.NewCall) names a method by Service.Method, "/shop.Payments/Charge".
//
// HandlePgx and HandleSQL run the handler under the barrier in the same local transaction as
// its business work: a repeated call, or a forward call after its undo, does not run it again
// and answers an empty response (or ABORTED).
type Service struct {
	name    string
	opts    ServiceOptions
	methods map[string]bool
	desc    grpc.ServiceDesc
}

// ServiceOptions give a Service what its barrier-protected methods need. A Service whose
// methods use Handle only needs none (pass nil).
type ServiceOptions struct {
	// Barrier protects the methods added with HandlePgx and HandleSQL.
	Barrier *Barrier
	// Pgx is the database HandlePgx methods run their transaction on.
	Pgx PgxDB
	// SQL is the database HandleSQL methods run their transaction on.
	SQL *sql.DB
}

// NewService starts a service named name: a protobuf full name such as "payments" or
// "shop.v1.Payments". It panics on an invalid name, as a mistake in the program's wiring.
func NewService(name string, opts *ServiceOptions) *Service {
	if !protoreflect.FullName(name).IsValid() {
		panic(fmt.Sprintf("participant: service name %q is not a protobuf full name (letters, digits, _ and dots, such as shop.v1.Payments)", name))
	}
	s := &Service{name: name, methods: map[string]bool{}}
	if opts != nil {
		s.opts = *opts
	}
	s.desc = grpc.ServiceDesc{ServiceName: name, HandlerType: (*any)(nil), Metadata: "participant.Service"}
	return s
}

// Name is the service's full name.
func (s *Service) Name() string { return s.name }

// Method returns the full gRPC name of one of the service's methods, "/" + service + "/" +
// method, as sdk.NewCall and the coordinator's targets spell it.
func (s *Service) Method(method string) string { return "/" + s.name + "/" + method }

// Desc returns the service's descriptor, for a registrar that wants it directly.
func (s *Service) Desc() *grpc.ServiceDesc { return &s.desc }

// Register registers the service on r (a *grpc.Server). Add every method before.
func (s *Service) Register(r grpc.ServiceRegistrar) { r.RegisterService(&s.desc, nil) }

// Handle adds method to s: h receives the decoded request and returns the response.
func Handle[In, Out proto.Message](s *Service, method string, h func(ctx context.Context, in In) (Out, error)) {
	s.add(method, func() proto.Message { return newMessage[In]() }, func(ctx context.Context, in any) (any, error) {
		out, err := h(ctx, in.(In))
		if err != nil {
			return nil, ToStatus(err)
		}
		return out, nil
	})
}

// HandlePgx adds method to s, running h under the service's Barrier in a transaction on its
// Pgx database (Barrier.CallPgxDB): h's writes and the barrier row commit together. A call the
// barrier skips answers an empty Out.
func HandlePgx[In, Out proto.Message](s *Service, method string, h func(ctx context.Context, tx pgx.Tx, in In) (Out, error)) {
	if s.opts.Barrier == nil || s.opts.Pgx == nil {
		panic(fmt.Sprintf("participant: %s: HandlePgx needs ServiceOptions.Barrier and ServiceOptions.Pgx", s.Method(method)))
	}
	b, db := s.opts.Barrier, s.opts.Pgx
	s.add(method, func() proto.Message { return newMessage[In]() }, func(ctx context.Context, in any) (any, error) {
		md, _ := FromContext(ctx)
		out := newMessage[Out]()
		err := b.CallPgxDB(ctx, db, md, func(ctx context.Context, tx pgx.Tx) error {
			o, err := h(ctx, tx, in.(In))
			if err == nil {
				out = o
			}
			return err
		})
		if err != nil {
			return nil, ToStatus(err)
		}
		return out, nil
	})
}

// HandleSQL is HandlePgx for database/sql: h runs under the Barrier in a transaction on the
// service's SQL database (Barrier.CallSQLDB), PostgreSQL or SQLite as the Barrier's dialect says.
func HandleSQL[In, Out proto.Message](s *Service, method string, h func(ctx context.Context, tx *sql.Tx, in In) (Out, error)) {
	if s.opts.Barrier == nil || s.opts.SQL == nil {
		panic(fmt.Sprintf("participant: %s: HandleSQL needs ServiceOptions.Barrier and ServiceOptions.SQL", s.Method(method)))
	}
	b, db := s.opts.Barrier, s.opts.SQL
	s.add(method, func() proto.Message { return newMessage[In]() }, func(ctx context.Context, in any) (any, error) {
		md, _ := FromContext(ctx)
		out := newMessage[Out]()
		err := b.CallSQLDB(ctx, db, md, func(ctx context.Context, tx *sql.Tx) error {
			o, err := h(ctx, tx, in.(In))
			if err == nil {
				out = o
			}
			return err
		})
		if err != nil {
			return nil, ToStatus(err)
		}
		return out, nil
	})
}

// newMessage returns a new, empty message of type M (a pointer to a generated struct): a nil
// *M still knows its message type.
func newMessage[M proto.Message]() M {
	var zero M
	return zero.ProtoReflect().Type().New().Interface().(M)
}

func (s *Service) add(method string, newIn func() proto.Message, h func(ctx context.Context, in any) (any, error)) {
	if !protoreflect.Name(method).IsValid() {
		panic(fmt.Sprintf("participant: service %s: method name %q is not a protobuf identifier", s.name, method))
	}
	if s.methods[method] {
		panic(fmt.Sprintf("participant: %s added twice", s.Method(method)))
	}
	s.methods[method] = true
	full := s.Method(method)
	s.desc.Methods = append(s.desc.Methods, grpc.MethodDesc{
		MethodName: method,
		Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
			in := newIn()
			if err := dec(in); err != nil {
				return nil, err
			}
			handler := func(ctx context.Context, req any) (any, error) {
				if _, ok := FromContext(ctx); !ok {
					var err error
					if ctx, err = withIncoming(ctx); err != nil {
						return nil, err
					}
				}
				return h(ctx, req)
			}
			if interceptor == nil {
				return handler(ctx, in)
			}
			return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: full}, handler)
		},
	})
}
