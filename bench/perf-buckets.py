#!/usr/bin/env python3
# Shares of perf samples by component of the xDS client path (first matching frame).
# usage: perf script -i perf.data -F comm,tid,ip,sym > s.txt; bench/perf-buckets.py s.txt
import sys, re, collections
path = sys.argv[1]
samples=[];cur=[]
for line in open(path, errors='replace'):
    line=line.rstrip('\n')
    if not line.strip():
        if cur: samples.append(cur)
        cur=[];continue
    if line[0] in '\t ':
        parts=line.strip().split(None,1)
        sym=parts[1] if len(parts)>1 else '?'
        cur.append(re.sub(r'\+0x[0-9a-f]+$','',sym))
if cur: samples.append(cur)
buckets=[('harness apply (route decode)','ResourceHandler>::apply'),
 ('client handle (rest)','sotw::Stream::handle'),
 ('tonic decode (Streaming::poll_next)','Streaming<T> as futures_core::stream::Stream>::poll_next'),
 ('pipe task (PipeToSendStream/EncodeBody)','PipeToSendStream'),
 ('h2 write/flush','FramedWrite<T,B>::flush'),
 ('h2 read (FramedRead)','FramedRead<T> as futures_core::stream::Stream>::poll_next'),
 ('h2 conn other','h2::proto::connection::Connection<T,P,B>::poll'),
 ('hyper conn task other','H2ClientFuture'),
 ('tokio park/epoll','Parker::park'),
 ('tokio scheduler','worker::Context::run'),
]
c=collections.Counter()
for fr in samples:
    for name,pat in buckets:
        if any(pat in s for s in fr):
            c[name]+=1;break
    else:
        c['other: '+fr[0][:80]]+=1
t=len(samples)
for k,v in c.most_common(40): print(f"{100*v/t:6.2f}% {k}")
