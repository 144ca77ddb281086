package grpcauth

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// TargetTLS is the transport of the participant endpoints whose addresses match Match.
type TargetTLS struct {
	// Match is a pattern of host:port, or of the host alone (then any port matches). '*' matches
	// any run of characters, everything else itself, case-insensitively: "*.payments.svc:443",
	// "10.1.2.*", "*". Ignored in ParticipantTLSConfig.Default.
	Match string `json:"match,omitempty"`
	// Plaintext turns TLS off for matching addresses (a mesh sidecar on localhost, say).
	Plaintext bool `json:"plaintext,omitempty"`
	// CA is a PEM bundle of the CAs that sign the participants' certificates; empty means the
	// system's roots.
	CA string `json:"ca,omitempty"`
	// Cert and Key are the coordinator's client certificate and key (PEM) for mutual TLS; both or
	// neither. They are re-read when the files change.
	Cert string `json:"cert,omitempty"`
	Key  string `json:"key,omitempty"`
	// ServerName is the name the participant's certificate must carry. Empty means the host of
	// the endpoint's first address, so set it when one target lists several addresses that
	// share a certificate.
	ServerName string `json:"server_name,omitempty"`
}

// ParticipantTLSConfig chooses the transport of each participant endpoint: the first entry of
// Targets whose Match fits every address of the endpoint, else Default, else plaintext.
type ParticipantTLSConfig struct {
	Default *TargetTLS  `json:"default,omitempty"`
	Targets []TargetTLS `json:"targets,omitempty"`
}

// Empty reports whether the configuration leaves every participant on plaintext.
func (c ParticipantTLSConfig) Empty() bool { return c.Default == nil && len(c.Targets) == 0 }

// ReadParticipantTLSFile reads a ParticipantTLSConfig from a JSON file, for example
//
//	{
//	  "default": {"ca": "/etc/treaty/participants-ca.pem", "cert": "coord.pem", "key": "coord-key.pem"},
//	  "targets": [
//	    {"match": "*.payments.svc:443", "ca": "payments-ca.pem", "server_name": "payments.internal"},
//	    {"match": "127.0.0.1", "plaintext": true}
//	  ]
//	}
//
// Unknown fields are errors (a misspelt "server_name" would silently weaken verification), and
// relative paths are relative to the file's directory.
func ReadParticipantTLSFile(path string) (ParticipantTLSConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return ParticipantTLSConfig{}, fmt.Errorf("participant TLS file: %w", err)
	}
	var cfg ParticipantTLSConfig
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return ParticipantTLSConfig{}, fmt.Errorf("participant TLS file %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	abs := func(t *TargetTLS) {
		for _, p := range []*string{&t.CA, &t.Cert, &t.Key} {
			if *p != "" && !filepath.IsAbs(*p) {
				*p = filepath.Join(dir, *p)
			}
		}
	}
	if cfg.Default != nil {
		abs(cfg.Default)
	}
	for i := range cfg.Targets {
		abs(&cfg.Targets[i])
	}
	return cfg, nil
}

// ParticipantTLS holds loaded transport settings for participant endpoints.
type ParticipantTLS struct {
	rules []ruleCreds
	def   ruleCreds // creds nil: plaintext
}

type ruleCreds struct {
	match string
	creds credentials.TransportCredentials
	desc  string
}

// NewParticipantTLS loads every CA, certificate and key named in cfg, so that a mistake fails the
// start rather than the first call to some participant.
func NewParticipantTLS(cfg ParticipantTLSConfig, logger *slog.Logger) (*ParticipantTLS, error) {
	p := &ParticipantTLS{def: ruleCreds{desc: "plaintext (no rule matched)"}}
	if cfg.Default != nil {
		rc, err := loadRule(*cfg.Default, logger)
		if err != nil {
			return nil, fmt.Errorf("participant TLS default: %w", err)
		}
		p.def = rc
	}
	for i, t := range cfg.Targets {
		if strings.TrimSpace(t.Match) == "" {
			return nil, fmt.Errorf("participant TLS target %d: match is empty; want a pattern such as *.svc:443", i+1)
		}
		rc, err := loadRule(t, logger)
		if err != nil {
			return nil, fmt.Errorf("participant TLS target %d (%s): %w", i+1, t.Match, err)
		}
		rc.match = strings.ToLower(t.Match)
		p.rules = append(p.rules, rc)
	}
	return p, nil
}

func loadRule(t TargetTLS, logger *slog.Logger) (ruleCreds, error) {
	if t.Plaintext {
		if t.CA != "" || t.Cert != "" || t.Key != "" || t.ServerName != "" {
			return ruleCreds{}, errors.New("plaintext excludes ca, cert, key and server_name")
		}
		return ruleCreds{creds: insecure.NewCredentials(), desc: "plaintext"}, nil
	}
	if (t.Cert == "") != (t.Key == "") {
		return ruleCreds{}, errors.New("cert and key go together: set both for mutual TLS, or neither")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	desc := "TLS, system roots"
	if t.CA != "" {
		pool, err := loadCAs(t.CA)
		if err != nil {
			return ruleCreds{}, fmt.Errorf("ca: %w", err)
		}
		cfg.RootCAs = pool
		desc = "TLS, CA " + t.CA
	}
	if t.Cert != "" {
		kp, err := loadKeyPair(t.Cert, t.Key, logger, time.Now)
		if err != nil {
			return ruleCreds{}, err
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return kp.get(), nil }
		desc += ", client certificate " + t.Cert
	}
	return ruleCreds{creds: credentials.NewTLS(cfg), desc: desc}, nil
}

// TransportFor returns the transport credentials for an endpoint's addresses; it fits
// invoke.Config.TransportFor. Every address of one endpoint shares a connection, so they must
// all fall under the same rule.
func (p *ParticipantTLS) TransportFor(addrs []string) ([]grpc.DialOption, error) {
	if len(addrs) == 0 {
		return nil, errors.New("no address")
	}
	chosen := p.ruleFor(addrs[0])
	for _, a := range addrs[1:] {
		if r := p.ruleFor(a); r != chosen {
			return nil, fmt.Errorf("addresses %s and %s of one target fall under different participant TLS rules (%s; %s); one target has one transport", addrs[0], a, p.describe(chosen), p.describe(r))
		}
	}
	rc := p.def
	if chosen >= 0 {
		rc = p.rules[chosen]
	}
	if rc.creds == nil {
		return nil, nil
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(rc.creds)}, nil
}

// Describe says which transport an address gets, for logs and docs; it never shows a secret
// (there is none in a path).
func (p *ParticipantTLS) Describe(addr string) string { return p.describe(p.ruleFor(addr)) }

func (p *ParticipantTLS) describe(i int) string {
	if i < 0 {
		return "default: " + p.def.desc
	}
	return "rule " + p.rules[i].match + ": " + p.rules[i].desc
}

// ruleFor returns the index of the first rule matching addr, or -1 for the default.
func (p *ParticipantTLS) ruleFor(addr string) int {
	addr = strings.ToLower(addr)
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	for i, r := range p.rules {
		subject := addr
		if _, _, err := net.SplitHostPort(r.match); err != nil {
			subject = host // the pattern names no port: any port matches
		}
		if glob(r.match, subject) {
			return i
		}
	}
	return -1
}

// glob matches s against pattern, where '*' matches any run of characters (dots and colons
// included) and every other byte matches itself.
func glob(pattern, s string) bool {
	star, starS := -1, 0
	pi, si := 0, 0
	for si < len(s) {
		switch {
		case pi < len(pattern) && pattern[pi] == '*':
			star, starS = pi, si
			pi++
		case pi < len(pattern) && pattern[pi] == s[si]:
			pi++
			si++
		case star >= 0:
			starS++
			pi, si = star+1, starS
		default:
			return false
		}
	}
	for pi < len(pattern) && pattern[pi] == '*' {
		pi++
	}
	return pi == len(pattern)
}
