"""Tile counts for a sliding window (512, 512): tiles per program, masked share, visited / useful pairs, for
the forward (64x64), dQ (128x64) and dK/dV (64x128) tiles of the sm90 D=128 tables. A Python copy of the kernels'
kv_tile_range / q_tile_range (kernels/common.py) so it runs anywhere. Usage: python benchmarks/window_tiles.py"""
def cdiv(a,b): return -(-a//b)
def kv_range(start_m, Sk, diag, L, R, BM, BN):
    hi=Sk; lo=0; flo=0; fhi=Sk//BN*BN
    if R>=0:
        hi=max(min(hi,start_m+BM+diag+R),0); fhi=min(fhi, max(start_m+diag+R+1,0)//BN*BN)
    if L>=0:
        lo=max(start_m+diag-L,0)//BN*BN; flo=cdiv(max(start_m+BM-1+diag-L,0),BN)*BN
    ht=cdiv(hi,BN)*BN; flo=min(flo,ht); fhi=min(max(fhi,flo),ht)
    return lo,flo,fhi,hi
def q_range(start_n, Sq, diag, L, R, BM, BN):
    lo=0; hi=Sq; flo=0; fhi=cdiv(Sq,BM)*BM
    if R>=0:
        lo=max(start_n-diag-R,0)//BM*BM; flo=cdiv(max(start_n+BN-1-diag-R,0),BM)*BM
    if L>=0:
        hi=min(max(start_n+BN-diag+L,0),Sq); fhi=min(fhi,max(start_n-diag+L+1,0)//BM*BM)
    ht=cdiv(hi,BM)*BM; flo=min(flo,ht); fhi=min(max(fhi,flo),ht)
    return lo,flo,fhi,hi
def useful(S,L,R):
    n=0
    for i in range(S):
        a=0 if L<0 else max(0,i-L); b=S-1 if R<0 else min(S-1,i+R); n+=max(0,b-a+1)
    return n
def stats(S,L,R,BM,BN,kind):
    full=masked=0; progs=0; loops=0
    if kind=="q":  # fwd / dq: per query tile
        for m in range(0,S,BM):
            lo,flo,fhi,hi=kv_range(m,S,0,L,R,BM,BN)
            a=(flo-lo)//BN if L>=0 else 0; f=max(0,(fhi-flo)//BN); c=max(0,cdiv(hi-fhi,BN)) if hi>fhi else 0
            masked+=a+c; full+=f; progs+=1; loops+= (a>0)+(f>0)+(c>0)
    else:
        for n in range(0,S,BN):
            lo,flo,fhi,hi=q_range(n,S,0,L,R,BM,BN)
            a=(flo-lo)//BM if R>=0 else 0; f=max(0,(fhi-flo)//BM); c=max(0,cdiv(hi-fhi,BM)) if hi>fhi else 0
            masked+=a+c; full+=f; progs+=1; loops+=(a>0)+(f>0)+(c>0)
    return full, masked, progs
for S in (2048,4096,8192):
    u=useful(S,512,512); ud=S*S
    for name,BM,BN,kind in (("fwd 64x64",64,64,"q"),("dq 128x64",128,64,"q"),("dkdv 64x128",64,128,"k")):
        f,m,p=stats(S,512,512,BM,BN,kind)
        vis=(f+m)*BM*BN
        print(f"S={S} {name}: tiles/prog {(f+m)/p:.1f} (masked {m/p:.1f}), visited/useful {vis/u:.2f}, masked share {m/(f+m):.2f}")
