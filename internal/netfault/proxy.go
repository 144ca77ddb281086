// Package netfault is a TCP proxy that misbehaves on request, for tests and the chaos campaign:
// put it between a coordinator and PostgreSQL (or a participant) and add latency, reset every
// connection, or blackhole the link for as long as a test needs.
//
// A blackhole holds traffic rather than dropping it: bytes already read wait, nothing is
// forwarded in either direction and new connections are accepted but not connected upstream,
// as in a network partition during which the peers' TCP stacks keep retransmitting. Healing
// releases what was held, in order, so a connection that survives the partition carries on, as
// it would on a real network whose partition ended before TCP gave up.
package netfault

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy forwards TCP connections from its listener to one upstream address.
type Proxy struct {
	upstream string
	lis      net.Listener

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	open    chan struct{} // closed while traffic flows; replaced by an open one during a blackhole
	latency time.Duration
	closed  bool

	accepted atomic.Int64
	resets   atomic.Int64
	wg       sync.WaitGroup
}

// Start listens on 127.0.0.1 (a free port) and forwards to upstream ("host:port").
func Start(upstream string) (*Proxy, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("netfault: listen: %w", err)
	}
	open := make(chan struct{})
	close(open)
	p := &Proxy{upstream: upstream, lis: lis, conns: map[net.Conn]struct{}{}, open: open}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's listen address, host:port.
func (p *Proxy) Addr() string { return p.lis.Addr().String() }

// Accepted is the number of connections accepted so far.
func (p *Proxy) Accepted() int64 { return p.accepted.Load() }

// SetLatency delays every chunk of data forwarded, in each direction, by d (0: none).
func (p *Proxy) SetLatency(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.latency = d
}

// Blackhole stops forwarding anything, in both directions and for new connections, until Heal.
func (p *Proxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open:
		p.open = make(chan struct{})
	default: // already blackholed
	}
}

// Heal ends a blackhole: held traffic flows again.
func (p *Proxy) Heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open:
	default:
		close(p.open)
	}
}

// Reset closes every open connection with a TCP reset (both sides see "connection reset by
// peer"); new connections are accepted as before. It returns how many it reset.
func (p *Proxy) Reset() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for c := range p.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.Close()
		delete(p.conns, c)
		n++
	}
	p.resets.Add(int64(n))
	return n
}

// Resets is the number of connections Reset closed so far.
func (p *Proxy) Resets() int64 { return p.resets.Load() }

// Close stops listening and closes every connection. It is idempotent.
func (p *Proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	_ = p.lis.Close()
	for c := range p.conns {
		_ = c.Close()
	}
	select {
	case <-p.open:
	default:
		close(p.open) // release goroutines held by a blackhole
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// gate returns the channel to wait on before forwarding, and the current latency.
func (p *Proxy) gate() (<-chan struct{}, time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.open, p.latency
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		if !p.track(c) {
			_ = c.Close()
			return
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

func (p *Proxy) serve(down net.Conn) {
	defer p.wg.Done()
	defer p.untrack(down)
	defer down.Close()
	// A blackhole also holds connection setup.
	open, _ := p.gate()
	<-open
	up, err := net.DialTimeout("tcp", p.upstream, 10*time.Second)
	if err != nil {
		return
	}
	if !p.track(up) {
		_ = up.Close()
		return
	}
	defer p.untrack(up)
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() { p.pipe(up, down); done <- struct{}{} }()
	go func() { p.pipe(down, up); done <- struct{}{} }()
	<-done
	// One direction ended: end the other too.
	_ = up.Close()
	_ = down.Close()
	<-done
}

// pipe copies src to dst chunk by chunk, waiting out blackholes and latency before each write.
func (p *Proxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			open, latency := p.gate()
			<-open
			if latency > 0 {
				time.Sleep(latency)
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				return
			}
			if tc, ok := dst.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
			return
		}
	}
}
