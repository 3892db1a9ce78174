package sender

// SetTestTransport makes every Sender of this test binary use kind
// (TransportLean or TransportStdlib; "" the default): `make test` runs the
// package's tests through both (WALHOOK_TEST_HTTP_TRANSPORT).
func SetTestTransport(kind string) { transportUnderTest = kind }

// UsesStdlib reports whether s sends with net/http's Transport.
func UsesStdlib(s *Sender) bool { return s.stdlib && s.trusted.stdlib && s.guarded.stdlib }
