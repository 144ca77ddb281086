package grpcauth

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// reloadCheckInterval is how often, at most, a handshake looks at a key pair's files. Stat calls
// are cheap, but a busy server does thousands of handshakes a second.
const reloadCheckInterval = time.Second

// ServerTLS returns the TLS configuration of a gRPC server: the certificate and key from
// certFile and keyFile (PEM), re-read when the files change, TLS 1.2 or newer. When clientCAFile
// is set, every client must present a certificate signed by one of its CAs (mutual TLS).
func ServerTLS(certFile, keyFile, clientCAFile string, logger *slog.Logger) (*tls.Config, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("TLS needs both a certificate file and a key file")
	}
	kp, err := loadKeyPair(certFile, keyFile, logger, time.Now)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return kp.get(), nil },
	}
	if clientCAFile != "" {
		pool, err := loadCAs(clientCAFile)
		if err != nil {
			return nil, fmt.Errorf("client CA: %w", err)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// loadCAs reads a PEM bundle of CA certificates.
func loadCAs(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate found", path)
	}
	return pool, nil
}

// keyPair is a certificate and key that follow their files, so that certificates can be rotated
// (cert-manager, Vault agents) without restarting the coordinator. A rotation caught half-written
// keeps the previous pair until the files are consistent again.
type keyPair struct {
	certFile, keyFile string
	log               *slog.Logger
	now               func() time.Time

	mu      sync.Mutex
	cert    *tls.Certificate
	stamp   fileStamp
	checked time.Time
}

// fileStamp tells whether either file changed: modification times and sizes of both.
type fileStamp struct {
	certMod, keyMod   time.Time
	certSize, keySize int64
}

func stampOf(certFile, keyFile string) (fileStamp, error) {
	c, err := os.Stat(certFile)
	if err != nil {
		return fileStamp{}, err
	}
	k, err := os.Stat(keyFile)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{certMod: c.ModTime(), keyMod: k.ModTime(), certSize: c.Size(), keySize: k.Size()}, nil
}

func loadKeyPair(certFile, keyFile string, logger *slog.Logger, now func() time.Time) (*keyPair, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	st, err := stampOf(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS key pair: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS key pair %s, %s: %w", certFile, keyFile, err)
	}
	return &keyPair{certFile: certFile, keyFile: keyFile, log: logger, now: now, cert: &cert, stamp: st, checked: now()}, nil
}

// get returns the current pair, re-reading the files when they changed.
func (k *keyPair) get() *tls.Certificate {
	k.mu.Lock()
	defer k.mu.Unlock()
	now := k.now()
	if now.Sub(k.checked) < reloadCheckInterval {
		return k.cert
	}
	k.checked = now
	st, err := stampOf(k.certFile, k.keyFile)
	if err != nil || st == k.stamp {
		return k.cert
	}
	cert, err := tls.LoadX509KeyPair(k.certFile, k.keyFile)
	if err != nil {
		// Probably caught between writing the certificate and the key: keep serving the old
		// pair, and look again at the next check.
		k.log.Warn("TLS key pair changed but does not load; keeping the previous one", "cert", k.certFile, "key", k.keyFile, "err", err)
		return k.cert
	}
	if !bytes.Equal(cert.Certificate[0], k.cert.Certificate[0]) {
		k.log.Info("TLS key pair reloaded", "cert", k.certFile)
	}
	k.cert, k.stamp = &cert, st
	return k.cert
}
