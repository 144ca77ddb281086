package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	carv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/car/v1"
	flightv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/flight/v1"
	hotelv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/hotel/v1"
	"github.com/treatyhq/treaty/sdk/participant"
)

// service is one participant process: an inventory behind a gRPC server on loopback. It can
// crash (server and storage gone, the address refusing connections) and be restarted on the
// same address from its database.
type service struct {
	inv      *inventory
	store    *serviceStore
	faults   *faults
	register func(*grpc.Server)

	mu   sync.Mutex
	addr string
	srv  *grpc.Server
	done chan struct{} // closed when Serve returned
}

func newService(name, title, unit, run string, be *backend, f *faults) *service {
	st := &serviceStore{name: name, be: be}
	s := &service{inv: &inventory{name: name, title: title, run: run, unit: unit, store: st}, store: st, faults: f}
	f.svc = s
	switch name {
	case "flight":
		s.register = func(g *grpc.Server) { flightv1.RegisterFlightServiceServer(g, &flightServer{inv: s.inv}) }
	case "hotel":
		s.register = func(g *grpc.Server) { hotelv1.RegisterHotelServiceServer(g, &hotelServer{inv: s.inv}) }
	case "car":
		s.register = func(g *grpc.Server) { carv1.RegisterCarServiceServer(g, &carServer{inv: s.inv}) }
	}
	return s
}

// Addr is the service's gRPC address; it stays the same across restarts.
func (s *service) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// start opens the storage and serves gRPC, on a new loopback port the first time and on the
// same address after a crash.
func (s *service) start(ctx context.Context) error {
	if err := s.store.start(ctx); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	addr := s.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		_ = s.store.stop(ctx)
		return fmt.Errorf("%s service: listen on %s: %w", s.inv.name, addr, err)
	}
	s.addr = lis.Addr().String()
	// The metadata interceptor runs first so that the fault injector knows the call's op and gid.
	s.srv = grpc.NewServer(grpc.ChainUnaryInterceptor(participant.UnaryServerInterceptor(), s.faults.interceptor))
	s.register(s.srv)
	s.done = make(chan struct{})
	srv, done := s.srv, s.done
	go func() { defer close(done); _ = srv.Serve(lis) }()
	return nil
}

// stop ends the service abruptly: open connections are cut, calls in flight fail, the relay
// stops and the database is closed. Restart it with start.
func (s *service) stop(ctx context.Context) error {
	s.mu.Lock()
	srv, done := s.srv, s.done
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		srv.Stop()
		<-done
	}
	return s.store.stop(ctx)
}

// faults injects failures into one service's calls, in a gRPC server interceptor behind the
// Treaty metadata interceptor:
//
//   - refuse (--fail): every forward call (saga action, TCC try) is refused with ABORTED, the
//     business "no", as if nothing were left. Undo calls still work: refusing them would leave
//     the other services' reservations waiting for an operator.
//   - chaos (--chaos p): a fraction p of calls fail with UNAVAILABLE, half of them before the
//     handler runs and half after it committed (the answer lost), which only the barrier makes
//     safe to retry.
//   - crash: the next forward call of one transaction commits, then the service crashes before
//     answering.
type faults struct {
	svc     *service
	refuse  bool
	chaos   float64
	injects atomic.Int64 // chaos failures injected

	crashMu  sync.Mutex
	crashGID string
	crashed  chan struct{}
}

// armCrash makes the service crash right after it commits the forward call of gid. The returned
// channel is closed once it is down.
func (f *faults) armCrash(gid string) <-chan struct{} {
	f.crashMu.Lock()
	defer f.crashMu.Unlock()
	f.crashGID, f.crashed = gid, make(chan struct{})
	return f.crashed
}

func (f *faults) interceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	md, _ := participant.FromContext(ctx)
	forward := md.Op == participant.OpAction || md.Op == participant.OpTry
	if f.refuse && forward {
		return nil, status.Errorf(codes.Aborted, "the %s service refuses every booking (--fail %s)", f.svc.inv.name, f.svc.inv.name)
	}
	if f.chaos > 0 && rand.Float64() < f.chaos {
		f.injects.Add(1)
		if rand.IntN(2) == 0 {
			return nil, status.Errorf(codes.Unavailable, "chaos: %s call dropped before the handler ran", f.svc.inv.name)
		}
		if _, err := handler(ctx, req); err != nil {
			return nil, err
		}
		return nil, status.Errorf(codes.Unavailable, "chaos: %s handler committed but the answer was lost", f.svc.inv.name)
	}
	resp, err := handler(ctx, req)
	if err == nil && forward && f.takeCrash(md.GID) {
		// The work is committed; the process dies before the answer leaves. The coordinator
		// sees a broken call and retries against a dead address until the service is back.
		go func() {
			_ = f.svc.stop(context.Background())
			f.crashMu.Lock()
			close(f.crashed)
			f.crashMu.Unlock()
		}()
		return nil, status.Errorf(codes.Unavailable, "%s service crashed before answering", f.svc.inv.name)
	}
	return resp, err
}

func (f *faults) takeCrash(gid string) bool {
	f.crashMu.Lock()
	defer f.crashMu.Unlock()
	if f.crashGID == "" || f.crashGID != gid {
		return false
	}
	f.crashGID = ""
	return true
}

type flightServer struct {
	flightv1.UnimplementedFlightServiceServer
	inv *inventory
}

func flightBooking(s *flightv1.Seats) booking {
	if s == nil {
		return booking{}
	}
	return booking{TripID: s.TripId, Who: s.Traveler, Item: s.Flight, Units: int(s.Seats), Detail: fmt.Sprintf("%d seat(s)", s.Seats)}
}

func (s *flightServer) Reserve(ctx context.Context, r *flightv1.ReserveRequest) (*flightv1.ReserveResponse, error) {
	return &flightv1.ReserveResponse{}, s.inv.reserve(ctx, flightBooking(r.Seats))
}

func (s *flightServer) CancelReservation(ctx context.Context, r *flightv1.CancelReservationRequest) (*flightv1.CancelReservationResponse, error) {
	return &flightv1.CancelReservationResponse{}, s.inv.cancelReservation(ctx, r.TripId)
}

func (s *flightServer) Hold(ctx context.Context, r *flightv1.HoldRequest) (*flightv1.HoldResponse, error) {
	return &flightv1.HoldResponse{}, s.inv.hold(ctx, flightBooking(r.Seats))
}

func (s *flightServer) Confirm(ctx context.Context, r *flightv1.ConfirmRequest) (*flightv1.ConfirmResponse, error) {
	return &flightv1.ConfirmResponse{}, s.inv.confirm(ctx, r.TripId)
}

func (s *flightServer) Release(ctx context.Context, r *flightv1.ReleaseRequest) (*flightv1.ReleaseResponse, error) {
	return &flightv1.ReleaseResponse{}, s.inv.release(ctx, r.TripId)
}

type hotelServer struct {
	hotelv1.UnimplementedHotelServiceServer
	inv *inventory
}

func hotelBooking(r *hotelv1.Rooms) booking {
	if r == nil {
		return booking{}
	}
	return booking{TripID: r.TripId, Who: r.Guest, Item: r.Hotel, Units: int(r.Rooms), Detail: fmt.Sprintf("%d room(s), %d night(s)", r.Rooms, r.Nights)}
}

func (s *hotelServer) Reserve(ctx context.Context, r *hotelv1.ReserveRequest) (*hotelv1.ReserveResponse, error) {
	return &hotelv1.ReserveResponse{}, s.inv.reserve(ctx, hotelBooking(r.Rooms))
}

func (s *hotelServer) CancelReservation(ctx context.Context, r *hotelv1.CancelReservationRequest) (*hotelv1.CancelReservationResponse, error) {
	return &hotelv1.CancelReservationResponse{}, s.inv.cancelReservation(ctx, r.TripId)
}

func (s *hotelServer) Hold(ctx context.Context, r *hotelv1.HoldRequest) (*hotelv1.HoldResponse, error) {
	return &hotelv1.HoldResponse{}, s.inv.hold(ctx, hotelBooking(r.Rooms))
}

func (s *hotelServer) Confirm(ctx context.Context, r *hotelv1.ConfirmRequest) (*hotelv1.ConfirmResponse, error) {
	return &hotelv1.ConfirmResponse{}, s.inv.confirm(ctx, r.TripId)
}

func (s *hotelServer) Release(ctx context.Context, r *hotelv1.ReleaseRequest) (*hotelv1.ReleaseResponse, error) {
	return &hotelv1.ReleaseResponse{}, s.inv.release(ctx, r.TripId)
}

type carServer struct {
	carv1.UnimplementedCarServiceServer
	inv *inventory
}

func carBooking(r *carv1.Rental) booking {
	if r == nil {
		return booking{}
	}
	return booking{TripID: r.TripId, Who: r.Driver, Item: r.CarClass, Units: 1, Detail: fmt.Sprintf("%d day(s)", r.Days)}
}

func (s *carServer) Reserve(ctx context.Context, r *carv1.ReserveRequest) (*carv1.ReserveResponse, error) {
	return &carv1.ReserveResponse{}, s.inv.reserve(ctx, carBooking(r.Rental))
}

func (s *carServer) CancelReservation(ctx context.Context, r *carv1.CancelReservationRequest) (*carv1.CancelReservationResponse, error) {
	return &carv1.CancelReservationResponse{}, s.inv.cancelReservation(ctx, r.TripId)
}

func (s *carServer) Hold(ctx context.Context, r *carv1.HoldRequest) (*carv1.HoldResponse, error) {
	return &carv1.HoldResponse{}, s.inv.hold(ctx, carBooking(r.Rental))
}

func (s *carServer) Confirm(ctx context.Context, r *carv1.ConfirmRequest) (*carv1.ConfirmResponse, error) {
	return &carv1.ConfirmResponse{}, s.inv.confirm(ctx, r.TripId)
}

func (s *carServer) Release(ctx context.Context, r *carv1.ReleaseRequest) (*carv1.ReleaseResponse, error) {
	return &carv1.ReleaseResponse{}, s.inv.release(ctx, r.TripId)
}
