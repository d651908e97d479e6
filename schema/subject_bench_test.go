package schema

import "testing"

// BenchmarkSubject is building a batch's subject; the publisher does it once
// per direction, consumers check it per message.
func BenchmarkSubject(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		sink = Subject("flows", "web-01", Incoming)
	}
}

// BenchmarkSanitizeHost is turning a host name into its subject token.
func BenchmarkSanitizeHost(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		sink = SanitizeHost("Web-01.Prod.Example.COM")
	}
}

var sink string
