package cli

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"

	"github.com/treatyhq/treaty/internal/grpcauth"
)

// securityConfig holds the serve flags that secure the gRPC API and the calls to participants.
type securityConfig struct {
	tlsCert, tlsKey, tlsClientCA string
	tokensFile                   string
	rateLimit                    floatValue
	rateBurst, rateClients       int
	partTLS                      bool
	partCA, partCert, partKey    string
	partFile                     string
}

// floatValue is a flag.Getter for a float64, which the flags helper has no method for.
type floatValue float64

func (v *floatValue) String() string { return strconv.FormatFloat(float64(*v), 'g', -1, 64) }
func (v *floatValue) Get() any       { return float64(*v) }
func (v *floatValue) Set(s string) error {
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return fmt.Errorf("want a number such as 50 or 0.5")
	}
	*v = floatValue(f)
	return nil
}

const grpcTokensUsage = "file of gRPC API tokens, one name:secret per line (secrets of at least 16 characters;\n" +
	"      # comments). Callers send \"authorization: Bearer SECRET\"; the name identifies them in logs and\n" +
	"      rate limits. The environment variable TREATY_GRPC_TOKENS adds more as name:secret,name:secret.\n" +
	"      With any token configured, calls without a valid one fail UNAUTHENTICATED (health checks and\n" +
	"      reflection stay open). Tokens are never logged."

// addSecurityFlags registers the security flags of serve.
func addSecurityFlags(f *flags) *securityConfig {
	s := &securityConfig{}
	f.String(&s.tlsCert, "tls-cert", "", "PEM certificate of the gRPC API (with --tls-key); re-read when the file changes. Empty: plaintext")
	f.String(&s.tlsKey, "tls-key", "", "PEM private key of --tls-cert")
	f.String(&s.tlsClientCA, "tls-client-ca", "", "PEM bundle of CAs for mutual TLS: every client must present a certificate they signed")
	f.String(&s.tokensFile, "grpc-tokens-file", "", grpcTokensUsage)
	f.fs.Var(&s.rateLimit, "rate-limit", "gRPC calls per second allowed to one client (its token name, else its certificate\n"+
		"      subject, else its IP address); over it, RESOURCE_EXHAUSTED with a RetryInfo. 0: no limit")
	f.env["rate-limit"] = envName("rate-limit")
	f.Int(&s.rateBurst, "rate-burst", 0, "calls one client may make at once above --rate-limit (0: --rate-limit, rounded up)")
	f.Int(&s.rateClients, "rate-limit-clients", grpcauth.DefaultMaxClients, "most clients whose rate-limit state is kept; idle ones are forgotten first")
	f.Bool(&s.partTLS, "participant-tls", false, "call every participant over TLS, trusting the system's roots unless --participant-tls-ca")
	f.String(&s.partCA, "participant-tls-ca", "", "PEM bundle of CAs that sign participants' certificates (implies --participant-tls)")
	f.String(&s.partCert, "participant-tls-cert", "", "PEM client certificate the coordinator presents to participants, for mutual TLS (with --participant-tls-key)")
	f.String(&s.partKey, "participant-tls-key", "", "PEM private key of --participant-tls-cert")
	f.String(&s.partFile, "participant-tls-file", "", "JSON file of per-address participant TLS rules (match, ca, cert, key, server_name,\n"+
		"      plaintext), tried in order before the --participant-tls-* default; see docs/OPERATIONS.md")
	return s
}

// build loads certificates and tokens. Errors name the flag; none quotes a secret.
func (s *securityConfig) build(env Env, log *slog.Logger) (grpcauth.Config, *grpcauth.ParticipantTLS, error) {
	cfg := grpcauth.Config{RateLimit: float64(s.rateLimit), RateBurst: s.rateBurst, MaxClients: s.rateClients}
	switch {
	case s.tlsCert != "" || s.tlsKey != "":
		tlsCfg, err := grpcauth.ServerTLS(s.tlsCert, s.tlsKey, s.tlsClientCA, log)
		if err != nil {
			return cfg, nil, fmt.Errorf("--tls-cert, --tls-key, --tls-client-ca: %w", err)
		}
		cfg.TLS = tlsCfg
	case s.tlsClientCA != "":
		return cfg, nil, errors.New("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
	}
	var fromFile []grpcauth.Token
	if s.tokensFile != "" {
		var err error
		if fromFile, err = grpcauth.ReadTokensFile(s.tokensFile, log.Warn); err != nil {
			return cfg, nil, fmt.Errorf("--grpc-tokens-file: %w", err)
		}
	}
	fromEnv, err := grpcauth.ParseTokens(env.Getenv("TREATY_GRPC_TOKENS"))
	if err != nil {
		return cfg, nil, fmt.Errorf("TREATY_GRPC_TOKENS: %w", err)
	}
	if cfg.Tokens, err = grpcauth.MergeTokens(fromFile, fromEnv); err != nil {
		return cfg, nil, fmt.Errorf("--grpc-tokens-file and TREATY_GRPC_TOKENS: %w", err)
	}
	if rl := float64(s.rateLimit); rl < 0 {
		return cfg, nil, fmt.Errorf("--rate-limit %g: want >= 0 calls per second (0 = no limit)", rl)
	}
	if s.rateBurst < 0 {
		return cfg, nil, fmt.Errorf("--rate-burst %d: want >= 0", s.rateBurst)
	}
	if s.rateClients < 1 {
		return cfg, nil, fmt.Errorf("--rate-limit-clients %d: want >= 1", s.rateClients)
	}
	switch {
	case cfg.TLS == nil && len(cfg.Tokens) == 0:
		log.Warn("the gRPC API is open: no TLS and no tokens, so anyone who can reach --listen can start, inspect and roll back transactions; see --tls-cert and --grpc-tokens-file")
	case cfg.TLS == nil:
		log.Warn("gRPC bearer tokens travel in plaintext without --tls-cert; anyone on the network path can read and reuse them")
	}

	pt, err := s.participantTLS(log)
	if err != nil {
		return cfg, nil, err
	}
	return cfg, pt, nil
}

func (s *securityConfig) participantTLS(log *slog.Logger) (*grpcauth.ParticipantTLS, error) {
	var pc grpcauth.ParticipantTLSConfig
	if s.partFile != "" {
		var err error
		if pc, err = grpcauth.ReadParticipantTLSFile(s.partFile); err != nil {
			return nil, fmt.Errorf("--participant-tls-file: %w", err)
		}
	}
	if s.partTLS || s.partCA != "" || s.partCert != "" || s.partKey != "" {
		if pc.Default != nil {
			return nil, fmt.Errorf("--participant-tls-file %s has a default, and --participant-tls flags set one too; keep one", s.partFile)
		}
		pc.Default = &grpcauth.TargetTLS{CA: s.partCA, Cert: s.partCert, Key: s.partKey}
	}
	if pc.Empty() {
		return nil, nil
	}
	pt, err := grpcauth.NewParticipantTLS(pc, log)
	if err != nil {
		return nil, fmt.Errorf("participant TLS (--participant-tls-* or --participant-tls-file): %w", err)
	}
	log.Info("participant TLS", "default_tls", pc.Default != nil, "rules", len(pc.Targets))
	return pt, nil
}
